from django.urls import path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("s/<str:token>/", views.subject_page, name="subject"),
    path("s/<str:token>/tone/<int:trial>/<int:slot>.wav", views.tone, name="tone"),
    path("join/<str:join_token>/", views.join, name="join"),
    path("m/<str:media_token>", views.media, name="media"),
]
