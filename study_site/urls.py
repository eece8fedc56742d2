from django.conf import settings
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path(settings.ADMIN_URL_PREFIX, admin.site.urls),
    path("", include("experiments.urls")),
]
